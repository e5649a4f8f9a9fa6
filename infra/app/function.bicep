// The function app: Flex Consumption (FC1), runtime `custom` (the Rust custom handler named by
// host.json), a user-assigned identity for everything, and every app setting that the host's
// `%…%` expressions and lakeguard's `Settings::from_env` read. No key or connection string
// anywhere: each connection is `X__*ServiceUri` + `X__credential=managedidentity` + `X__clientId`.

param name string
param planName string
param location string
param tags object = {}

@description('azd finds the app by this tag: the service name in azure.yaml.')
param serviceName string = 'lakeguard'

param identityId string
param identityClientId string

param jobsBlobEndpoint string
param jobsQueueEndpoint string
param jobsTableEndpoint string
param deploymentContainerName string

param sourceBlobEndpoint string
param backupBlobEndpoint string

@allowed([
  'utf16'
  'hierarchical'
])
@description('Listing order of source and backup (README: LAKEGUARD_NAME_ORDER): hierarchical for ADLS Gen2.')
param nameOrder string = 'utf16'

@description('The source has a hierarchical namespace (README: LAKEGUARD_SOURCE_HNS): listings capture owners, groups, permissions, ACLs and directories.')
param sourceHns bool = false

param applicationInsightsConnectionString string

@minLength(3)
@maxLength(56)
param backupQueueName string = 'lakeguard-backup'

@minLength(3)
@maxLength(56)
param reconcileQueueName string = 'lakeguard-backup-reconcile'

@description('NCRONTAB (six fields) of the Reconcile timer.')
param reconcileSchedule string = '0 0 * * * *'
param pruneSchedule string = '0 30 3 * * *'
param eventQueueName string = 'lakeguard-backup-events'

@minValue(1)
@maxValue(256)
@description('LAKEGUARD_CONCURRENCY: parallel storage operations per invocation.')
param concurrency int = 16

@description('LAKEGUARD_CONTAINERS_INCLUDE (comma list; empty: all containers).')
param containersInclude string = ''

@description('LAKEGUARD_CONTAINERS_EXCLUDE (comma list).')
param containersExclude string = ''

@description('Name of the Data Factory of the datafactory copy engine; empty: the direct engine.')
param dataFactoryName string = ''
param dataFactoryResourceGroupName string = ''
param dataFactoryPipelineName string = ''

@minValue(1)
@maxValue(1000)
@description('Flex Consumption: most instances the app scales out to.')
param maximumInstanceCount int = 100

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

// LAKEGUARD_MAX_DEQUEUE_COUNT must mirror the host's maxDequeueCount, so it is read from the
// host.json that is deployed with the app.
var hostJson = loadJsonContent('../../host.json')

var baseSettings = {
  AzureWebJobsStorage__blobServiceUri: jobsBlobEndpoint
  AzureWebJobsStorage__queueServiceUri: jobsQueueEndpoint
  AzureWebJobsStorage__tableServiceUri: jobsTableEndpoint
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  SourceStorage__blobServiceUri: sourceBlobEndpoint
  SourceStorage__credential: 'managedidentity'
  SourceStorage__clientId: identityClientId
  BackupStorage__blobServiceUri: backupBlobEndpoint
  BackupStorage__credential: 'managedidentity'
  BackupStorage__clientId: identityClientId
  APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
  // Read by the host (function.json `%…%`): without them BackupWorker, ReconcileWorker and
  // Reconcile are not loaded at all, whatever lakeguard's own defaults are.
  LAKEGUARD_BACKUP_QUEUE: backupQueueName
  LAKEGUARD_RECONCILE_QUEUE: reconcileQueueName
  LAKEGUARD_RECONCILE_SCHEDULE: reconcileSchedule
  // The Prune timer deletes backups: with this identity's no-delete role it could only fail, so
  // it is disabled; prune runs under an operator identity (`lakeguard prune`).
  LAKEGUARD_EVENT_QUEUE: eventQueueName
  LAKEGUARD_PRUNE_SCHEDULE: pruneSchedule
  'AzureWebJobs.Prune.Disabled': 'true'
  'AzureWebJobs.PruneNow.Disabled': 'true'
  LAKEGUARD_MAX_DEQUEUE_COUNT: string(hostJson.extensions.queues.maxDequeueCount)
  LAKEGUARD_CONCURRENCY: string(concurrency)
  LAKEGUARD_NAME_ORDER: nameOrder
  LAKEGUARD_SOURCE_HNS: sourceHns ? 'true' : 'false'
  LAKEGUARD_CONTAINERS_INCLUDE: containersInclude
  LAKEGUARD_CONTAINERS_EXCLUDE: containersExclude
  LAKEGUARD_COPY_ENGINE: 'direct'
}

var dataFactorySettings = {
  LAKEGUARD_COPY_ENGINE: 'datafactory'
  LAKEGUARD_DATAFACTORY_SUBSCRIPTION_ID: subscription().subscriptionId
  LAKEGUARD_DATAFACTORY_RESOURCE_GROUP: dataFactoryResourceGroupName
  LAKEGUARD_DATAFACTORY_NAME: dataFactoryName
  LAKEGUARD_DATAFACTORY_PIPELINE: dataFactoryPipelineName
}

var appSettings = empty(dataFactoryName) ? baseSettings : union(baseSettings, dataFactorySettings)

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': serviceName
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      minTlsVersion: '1.2'
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${jobsBlobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'custom'
        version: '1.0'
      }
    }
  }
}

resource settings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: site
  name: 'appsettings'
  properties: appSettings
}

output name string = site.name
output defaultHostName string = site.properties.defaultHostName
