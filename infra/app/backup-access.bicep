// Who may do what on the backup account. Deployed in the backup account's resource group.
//
// The function's identity gets a custom role WITHOUT any delete right: a compromised function (or a
// bug) can add and overwrite blobs, but cannot delete a backup blob, a snapshot (the backup's
// history: every version is kept as a snapshot before its base blob is overwritten), a version or
// a container. The code paths the function runs never delete in the backup account (the producer's
// watermark discard overwrites the state with a marker). What must delete there runs under another
// identity: `lakeguard verify --restore-drill` (scratch containers) and pruning old backups, from an
// operator's CLI with the operator principal below.

param accountName string

@description('The function app\'s user-assigned identity; empty: no assignment (the account is shared with the jobs account, where the host role already applies).')
param functionPrincipalId string = ''

@description('The Data Factory\'s system-assigned identity (copy engine datafactory); empty: none.')
param factoryPrincipalId string = ''

@description('An operator principal (user, group or managed identity) for the CLI operations that delete in the backup account (restore drills, prune); empty: none.')
param operatorPrincipalId string = ''

@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param operatorPrincipalType string = 'User'

var roles = loadJsonContent('../roles.json')

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: accountName
}

// Everything lakeguard's function does in the backup account, and nothing more:
// - containers/read: list containers (reconcile, verify), container properties;
// - containers/write: create a backup container on its first copy, and lakeguard-state /
//   lakeguard-restores on first use;
// - generateUserDelegationKey/action: a read-only user-delegation SAS on a backup blob, the copy
//   source of a restore from backup;
// - blobs/read: listings with metadata and snapshots, Get Blob of lakeguard's state documents;
// - blobs/write, blobs/add/action: Copy Blob From URL / Put Blob From URL / Put Block From URL +
//   Put Block List (the copy), Snapshot Blob before an overwrite or tombstone, Set Blob Metadata,
//   conditional Put Blob of the state documents, restore undo copies.
// The not* lists repeat what is NOT granted, so a later edit that adds a wildcard still excludes it.
resource backupWriter 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, 'lakeguard-backup-writer')
  properties: {
    roleName: 'lakeguard backup writer ${uniqueString(resourceGroup().id)}'
    description: 'lakeguard: write and read backups in the backup account, create containers; no delete of blobs, snapshots, versions or containers.'
    type: 'CustomRole'
    assignableScopes: [
      resourceGroup().id
    ]
    permissions: [
      {
        actions: [
          'Microsoft.Storage/storageAccounts/blobServices/containers/read'
          'Microsoft.Storage/storageAccounts/blobServices/containers/write'
          'Microsoft.Storage/storageAccounts/blobServices/generateUserDelegationKey/action'
        ]
        notActions: [
          'Microsoft.Storage/storageAccounts/blobServices/containers/delete'
        ]
        dataActions: [
          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read'
          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/write'
          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/add/action'
        ]
        notDataActions: [
          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/delete'
          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/deleteBlobVersion/action'
          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/permanentDelete/action'
          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/immutableStorage/runAsSuperUser/action'
        ]
      }
    ]
  }
}

resource functionWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(functionPrincipalId)) {
  name: guid(account.id, functionPrincipalId, backupWriter.id)
  scope: account
  properties: {
    roleDefinitionId: backupWriter.id
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// The pipeline writes the backup blob (Put Blob From URL, conditional) and reads it back (Get
// Metadata): the same no-delete role is enough.
resource factoryWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(factoryPrincipalId)) {
  name: guid(account.id, factoryPrincipalId, backupWriter.id)
  scope: account
  properties: {
    roleDefinitionId: backupWriter.id
    principalId: factoryPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Storage Blob Data Contributor (includes delete): restore drills delete their scratch
// containers, prune deletes expired backups. Never the function's identity.
resource operatorContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(operatorPrincipalId)) {
  name: guid(account.id, operatorPrincipalId, roles.storageBlobDataContributor)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    principalId: operatorPrincipalId
    principalType: operatorPrincipalType
  }
}

output backupWriterRoleId string = backupWriter.id
