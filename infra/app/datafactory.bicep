// Optional Data Factory for the `datafactory` copy engine: the factory with a system-assigned
// identity and lakeguard's pipeline, dataset and linked service, loaded from datafactory/ (the
// same JSON the engine's tests execute), plus the narrow role that lets the function start and
// watch runs of it.

param name string
param location string
param tags object = {}

@description('The function app\'s user-assigned identity (starts pipeline runs).')
param runnerPrincipalId string

var linkedService = loadJsonContent('../../datafactory/linkedService/LakeguardBackupStorage.json')
var dataset = loadJsonContent('../../datafactory/dataset/LakeguardBackupBlob.json')
var pipeline = loadJsonContent('../../datafactory/pipeline/lakeguard-backup-copy.json')

resource factory 'Microsoft.DataFactory/factories@2018-06-01' = {
  name: name
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    publicNetworkAccess: 'Enabled'
  }
}

resource backupLinkedService 'Microsoft.DataFactory/factories/linkedservices@2018-06-01' = {
  parent: factory
  name: linkedService.name
  properties: linkedService.properties
}

resource backupDataset 'Microsoft.DataFactory/factories/datasets@2018-06-01' = {
  parent: factory
  name: dataset.name
  properties: dataset.properties
  dependsOn: [
    backupLinkedService
  ]
}

resource copyPipeline 'Microsoft.DataFactory/factories/pipelines@2018-06-01' = {
  parent: factory
  name: pipeline.name
  properties: pipeline.properties
  dependsOn: [
    backupDataset
  ]
}

// Narrower than the built-in Data Factory Contributor, which also allows pipelines/write: with
// it, a compromised function could rewrite the pipeline and run anything the factory's identity
// may do. The engine only calls Pipelines - Create Run, Pipeline Runs - Get and Pipeline Runs -
// Query By Factory (src/copy/datafactory.rs).
resource pipelineRunner 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, 'lakeguard-pipeline-runner')
  properties: {
    roleName: 'lakeguard pipeline runner ${uniqueString(resourceGroup().id)}'
    description: 'lakeguard: start runs of a Data Factory pipeline and read their status; cannot change pipelines, datasets, linked services or the factory.'
    type: 'CustomRole'
    assignableScopes: [
      resourceGroup().id
    ]
    permissions: [
      {
        actions: [
          'Microsoft.DataFactory/factories/pipelines/createrun/action'
          'Microsoft.DataFactory/factories/pipelineruns/read'
          'Microsoft.DataFactory/factories/querypipelineruns/action'
          'Microsoft.DataFactory/factories/querypipelineruns/read'
        ]
        notActions: []
        dataActions: []
        notDataActions: []
      }
    ]
  }
}

resource runnerAssignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(factory.id, runnerPrincipalId, pipelineRunner.id)
  scope: factory
  properties: {
    roleDefinitionId: pipelineRunner.id
    principalId: runnerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

output name string = factory.name
output principalId string = factory.identity.principalId
output pipelineName string = copyPipeline.name
